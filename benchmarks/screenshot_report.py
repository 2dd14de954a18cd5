"""Screenshot a he2st HTML report in a real browser engine (Chromium, through Qt WebEngine).

Not a dependency of he2st: install the engine in a separate environment first,

    python -m venv /tmp/qt && /tmp/qt/bin/pip install PyQt6 PyQt6-WebEngine
    /tmp/qt/bin/python benchmarks/screenshot_report.py RUN/report.html shot.png [--width 1280]

The page is loaded offscreen (``QT_QPA_PLATFORM=offscreen``, GPU off), resized to its full
scroll height (at most 16,000 px) and saved as one PNG. Used to check the report's
sections as a reader sees them (issue 17).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html")
    ap.add_argument("png")
    ap.add_argument("--width", type=int, default=1280)
    args = ap.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ.setdefault("QTWEBENGINE_CHROMIUM_FLAGS", "--no-sandbox --disable-gpu")
    from PyQt6.QtCore import QTimer, QUrl
    from PyQt6.QtWebEngineWidgets import QWebEngineView
    from PyQt6.QtWidgets import QApplication

    app = QApplication([sys.argv[0]])
    view = QWebEngineView()
    view.resize(args.width, 900)
    status = {"saved": False}

    def save() -> None:
        status["saved"] = view.grab().save(args.png)
        print(("saved " if status["saved"] else "could not save ") + args.png)
        app.quit()

    def sized(height: object) -> None:
        view.resize(args.width, min(int(height or 900), 16000))
        QTimer.singleShot(1500, save)  # let the resized page paint

    def loaded(ok: bool) -> None:
        if not ok:
            print(f"could not load {args.html}")
            app.quit()
            return
        QTimer.singleShot(1000, lambda: view.page().runJavaScript("document.documentElement.scrollHeight", sized))

    view.loadFinished.connect(loaded)
    view.load(QUrl.fromLocalFile(os.path.abspath(args.html)))
    view.show()
    QTimer.singleShot(60000, app.quit)
    app.exec()
    return 0 if status["saved"] else 1


if __name__ == "__main__":
    sys.exit(main())
