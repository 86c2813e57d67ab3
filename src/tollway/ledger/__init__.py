"""Money: wallets, the append-only ledger, and how each request is charged exactly once.

Promises kept here: a balance changes only through ledger entries whose id is their
idempotency key; concurrent requests cannot overspend (a hold is taken atomically before
anything is forwarded); amounts are integer micro-dollars (money.py); a request whose
answer reached the client is charged once, and one whose outcome Tollway never saw is
released, never charged.

Modules, in reading order:
  transactions.py  `Ledger`, the API every caller uses, and the reference transactions:
                   credit, debit, reserve, settle, release, the sweep's release, verify.
  holds.py         holds kept in the serving process's memory, and `ServingLock`, which
                   makes that process the sole server of its SQLite file.
  journal.py       the charge journal: a settle as one appended line, applied in batches.
  embedded.py      the embedded default's path: reserve against memory, settle into the
                   journal, apply and recover the journal's charges.
  postgres.py      PostgreSQL's reserve and settle as one statement each.
  set_aside.py     `tollway ledger resolve`: an operator's decision on a journaled charge
                   the ledger refused (set aside, reported by `ledger verify`).

Which path runs where, and where a charge becomes durable:

  deployment                         reserve                  settle                     charge durable at
  one `tollway serve` on SQLite      embedded: hold in memory embedded: journal append   the append (applied
  (the embedded default)                                      (+ flush every 10 ms)      to the tables <=10 ms on)
  `serve --workers N` on SQLite      transactions._reserve    transactions._settle       its COMMIT
  PostgreSQL (any number of workers) postgres.RESERVE         postgres.settle_statement  the statement
                                     (transactions: key       (transactions: no hold,
                                     spend limits)            charge above the hold)

The sweep of dead workers' holds is in auth/workers.py (it needs worker liveness); it
releases through `Ledger.release_swept`. This package imports nothing from the request
path or from auth/, so the money rules can be read on their own.
"""
