"""What every layer above runs on: Ray start and attach (`raycompat`), local and object-store paths
(`storage`), console and log files (`console`), atomic file writes (`files`), the Ray Jobs client
(`jobs`). Nothing here knows about datasets, models or stages."""
