"""The SQL store: tables (models), engine and sessions (db), queries (crud)."""
