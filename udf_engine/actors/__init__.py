"""The Ray actors of a UDF and their caller side: the builder, the master (control plane), the
workers, the dispatcher (data plane), the warm pool of spare workers and the policy of which
spares it keeps, and failure bisection."""
