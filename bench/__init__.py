"""
The imgresume benchmarks: C{python -m bench} (see C{docs/benchmarks.md}).

Every figure is printed as a ratio against baselines measured in the same
run on the same machine (a plain Python TCP copy, C{dd conv=fsync}, the
rsync daemon with C{--append-verify}, tus-node-server), because absolute numbers on a shared
machine mean little.  Nothing here asserts a timing.

Modules:

 - C{__main__}: the command line and the order of the groups;
 - C{_common}: work directory, test data, process CPU accounting, statistics;
 - C{baselines}: the reference transfers;
 - C{_tcpcopy}: the plain TCP copy's sender and receiver (run as processes);
 - C{imgresume_runs}: servers and balancer as real C{twistd} processes, and
   the single-stream, concurrency and resume groups;
 - C{_client}: the imgresume client process the groups drive;
 - C{tus}: tus-node-server and tus-js-client (Node; npm packages the bench
   installs itself), the baseline of issue 13, beside rsync;
 - C{tus_imgresume}: the same tus-js-client to C{twistd imgresume --http},
   direct and through the balancer to 3 servers (issue 14);
 - C{profile}: a py-spy run of the direct single stream, summarised;
 - C{report}: ratios, the printed table and the JSON file.
"""
