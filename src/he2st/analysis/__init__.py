"""Analysis of predictions: metrics tables, clustering, calibration, figures and the HTML report.

Submodules are imported on use (matplotlib and scikit-learn load only then)::

    from he2st.analysis.report import write_report
    from he2st.evaluate.clustering import cluster_agreement
"""
