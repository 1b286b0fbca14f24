"""The studies behind notebooks 07-11: each returns tables and numbers; the notebooks word them."""
