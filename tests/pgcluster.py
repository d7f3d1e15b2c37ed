"""The throwaway PostgreSQL cluster of the tests: it lives in the package (fedmed.store.pgcluster), where the
benchmarks use it too."""

from fedmed.store.pgcluster import PgCluster, find_bin_dir

__all__ = ["PgCluster", "find_bin_dir"]
