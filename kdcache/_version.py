"""The release, in a module of its own so that any module can say which kdcache wrote a file without
importing the package (and with it the store) first."""
__version__ = "0.1.0"
