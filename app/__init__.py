"""dropout-serve's HTTP service: settings -> registry (loading, runner) -> dataplane -> protocol doors -> main."""
