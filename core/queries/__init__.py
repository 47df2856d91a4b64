"""Read models for the operations console, one module per page: plain dataclasses and pandas
DataFrames.

    overview  tiles, status counts, sent and reconciliation series, stuck rows
    failed    triage: failed rows by class and provider, pages, exports (core.failed_filter)
    delivery  one delivery's detail, bounced letters, deliveries of an address
    audit     the audit log
    health    safety nets, providers' circuits, alerts
    bulk      bulk operations

Every function takes its session and, where time matters, `now`; nothing returns an ORM object
and nothing loads a whole table. Aggregation happens in SQL and leans on the partial indexes of
`core.models.Delivery`:

    ix_deliveries_due     scheduled rows by next_attempt_at   tiles, stuck rows
    ix_deliveries_lease   processing rows by lease_until      tiles, stuck rows
    ix_deliveries_failed  failed rows by error class, time    triage, bulk filters
    ix_deliveries_sent    sent rows by sent_at, deliver_at    sent in 24 h, lateness (index-only), throughput

Times in frames are timezone-aware UTC; ids are strings (the letter text is never read here).
The write side never imports this package (it brings pandas): the failed-rows filter it shares
is `core.failed_filter`, the lateness statistics `core.lateness`.
"""
