"""Storage: database engine, schema, caches. Foreign errors become ServiceUnavailable here."""
