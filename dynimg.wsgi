# mod_wsgi entry point for dynimg: the config beside this file, unless
# DYNIMG_CONFIG names another, and the application.
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("DYNIMG_CONFIG", os.path.join(here, "dynimg.ini"))
sys.path.insert(0, here)

from dynimg import application, get_config  # noqa: E402

get_config()  # a bad config stops the process here, with the section and key in the log
