"""Use cases. Handlers call exactly one service function; services own caching and transactions."""
