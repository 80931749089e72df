"""How skustudio reaches Ray: local start or an existing cluster, and resource planning."""
