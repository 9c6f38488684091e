"""dropout-serve's HTTP service: settings -> registry -> inference -> api -> main."""
