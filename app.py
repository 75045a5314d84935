"""`streamlit run app.py` from the repository root: the app in source/app.py, run as a script
with the settings in .streamlit/config.toml (10 MB uploads), as `streamlit run source/app.py`."""

import runpy
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "source"

# Streamlit runs this file as __main__ on every interaction; importing it does nothing.
if __name__ == "__main__":
    if str(SOURCE) not in sys.path:
        sys.path.insert(0, str(SOURCE))  # what `streamlit run source/app.py` does for its folder
    runpy.run_path(str(SOURCE / "app.py"), run_name="__main__")
