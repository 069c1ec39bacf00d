"""All SQL lives here, always with parameters. Each function takes an open psycopg connection (dict rows)."""
