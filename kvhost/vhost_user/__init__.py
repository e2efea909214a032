"""vhost-user: the wire format (sans-IO) and a frontend built on it."""
