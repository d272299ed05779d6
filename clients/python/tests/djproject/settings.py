"""Settings of the test project (tests/conftest.py fills DATABASES and FIELDKEY)."""

SECRET_KEY = "fieldkey-python-client-tests"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "djproject.shop"]
DATABASES: dict = {}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
FIELDKEY: dict = {}
