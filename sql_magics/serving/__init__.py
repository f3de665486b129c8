"""The web-service mode: a session's model functions answer HTTP on Ray Serve (``rayudf serve``,
``Session.serve``, ``!serve``): the replicas' app, the directory that tells them the functions and
versions, request parsing, coalescing into worker batches, metrics, and the server that runs it all."""
