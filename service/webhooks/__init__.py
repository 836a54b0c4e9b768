"""Signed webhooks for tasks: the callback URL's checks (``urls``) and the signatures
(``signing``). No Quart in here: the worker delivers them."""
