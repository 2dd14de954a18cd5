"""Method families: the machinery every method of a family shares, written once.

- :mod:`~he2st.methods.families.spot`: :class:`SpotRegressor` -- each spot from its
  own patch (ST-Net, DeepSpaCE, STimage).
- :mod:`~he2st.methods.families.slide`: :class:`SlideRegressor` -- all spots of a
  slide (or window) at once, with positions and spot graphs (HisToGene, Hist2ST,
  THItoGene).
- :mod:`~he2st.methods.families.contrastive`: :class:`ContrastiveRetrieval` -- a
  joint image/expression embedding, prediction by retrieval from a reference bank
  (BLEEP, mclSTExp, CMRCNet).

A method of a family subclasses its base and says only what differs (its
network, loss, targets and defaults); see docs/DEVELOPING.md.
"""
