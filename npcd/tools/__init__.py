"""Libraries behind `npcd train`, `npcd eval`, `npcd demo` and `npcd loadtest` (no argparse, no printing)."""
