"""Where the service meets its server and framework beyond their public settings.

- h2c.py: cleartext connections stay HTTP/1.1 unless ``HTTP2_CLEARTEXT`` is set.
"""
