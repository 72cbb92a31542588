# mod_wsgi entry point for dynimg: the config beside this file, unless
# DYNIMG_CONFIG names another, and the app built from it.
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("DYNIMG_CONFIG", os.path.join(here, "dynimg.ini"))
sys.path.insert(0, here)

from dynimg import create_app  # noqa: E402

# a bad config stops the process here, with the section and key in the log
application = create_app()
