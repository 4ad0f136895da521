"""Where a node keeps all of its state: SQLAlchemy 2 async models, engine and migrations."""
