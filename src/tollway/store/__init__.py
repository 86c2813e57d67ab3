"""Storage: database engine, schema, caches. Foreign errors become ServiceUnavailable here.

redis_wire.py is the exception: the rate limiter's own lean Redis connection, whose
failures (RedisWireError) the limiter answers by failing open, never with a 503.
"""
