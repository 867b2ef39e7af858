"""medzoo's built-in recipe plugins, installed as the ``medzoo_plugins`` package (never as ``plugins``)."""
