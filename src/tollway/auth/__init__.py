"""Customer keys: issue, verify, cache, revoke, and the worker liveness revocation relies on.

Promises kept here: a customer key is stored only as a keyed hash; random or forged keys
cost no lookup; a verification is cached for at most `cache.key_ttl_seconds`; and a revoke
returns only once no live worker will admit the key again.

Modules, in reading order:
  key_secret.py  the key format's secret: the tag every key carries, the subkey that signs
              cache entries, and the previous secret accepted during a rotation.
  keys.py     `Keys`: the key format, hashing at rest, verification with its cache layers
              (each worker's memory, then Redis when configured, then the database),
              create / list / revoke, expiry and spend-limit fields.
  workers.py  `WorkerRegistry`: each serving process's row and heartbeat, the revocation
              bus every worker polls and acknowledges, and the sweep that releases the
              holds of workers that are dead.
  process_identity.py  who a worker is (machine id, boot id, PID namespace, PID, start
              time, nonce) and when a worker on this host is provably gone.
  clerk.py    `ClerkKeys`: the `Keys` of `[auth] issuer = "clerk"`: keys verified by
              Clerk and cached in the same layers, single-flight, each key mirrored as an
              api_keys row so a key id or a subject evicts through the same bus; create,
              list and revoke go to Clerk.
  clerk_api.py  Clerk's Backend API (verify, create, list, revoke) and its failure
              policy: only 400/404 mean a bad key; anything else is a 503.

The revocation bound, by deployment:
  embedded default (one process, memory://)   immediate: the revoke evicts the process's
                                              own cache before it returns
  `--workers N` / PostgreSQL (+ Redis)        immediate for every live worker: the revoke
                                              waits for each worker's acknowledgement; a
                                              worker too silent to be waited for stops
                                              trusting its memory layer first
  `[auth] issuer = "clerk"`                   immediate for revocations made through Tollway
                                              or signalled by a configured Clerk webhook event;
                                              otherwise within key_ttl_seconds
The verification cache's storage (memory and Redis behind one protocol) is
store/cache.py.
"""
