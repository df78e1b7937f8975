"""Plain data that crosses every boundary and imports no JAX: configs, request options, results, the output filter,
what each checkpoint family honours."""
