"""The admin HTTP application: the admin API, its OpenAPI document, and client autoconfiguration."""
