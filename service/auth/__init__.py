"""Who is calling: API keys per tenant, their scopes, and the dependencies routes require."""
