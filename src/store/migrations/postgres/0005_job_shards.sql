-- Sharded re-encryption jobs (issue 21): a job's primary-key range is split into
-- shards, fixed once when the first runner plans the job; each has its own lease,
-- checkpoint and counters, so several runners work one table at once. fk_jobs keeps
-- the whole job: its state, the operators' control, and the counters summed over its
-- shards (rewritten with every shard update, in the same transaction), which is what
-- retirement and the compliance report read.
--
-- Jobs created before this migration have no shards: a runner of this version gives
-- such a job its one shard (copying the job's checkpoint and counters) when it first
-- claims it, once the lease of a runner of the previous version (fk_jobs.owner and
-- lease_until, which nothing else uses any more) has run out.
CREATE TABLE fk_job_shards (
    job_id      TEXT NOT NULL REFERENCES fk_jobs (job_id),
    shard       BIGINT NOT NULL CHECK (shard >= 0),
    lo          TEXT NULL,              -- exclusive lower bound (a primary key's text form); NULL: none
    hi          TEXT NULL,              -- inclusive upper bound; NULL: none
    state       TEXT NOT NULL CHECK (state IN ('pending', 'running', 'paused', 'completed', 'cancelled', 'failed')),
    owner       TEXT NULL,
    lease_until BIGINT NULL,
    checkpoint  TEXT NULL,              -- last primary key of the shard fully processed
    progress    TEXT NOT NULL,          -- JSON counters of this shard
    error       TEXT NULL,
    started_at  BIGINT NULL,
    updated_at  BIGINT NOT NULL,
    finished_at BIGINT NULL,
    PRIMARY KEY (job_id, shard)
);

-- How many shards the job was planned with (NULL: not planned yet). Set once, by the
-- planner's compare-and-set, in the transaction that inserts the shards.
ALTER TABLE fk_jobs ADD COLUMN shards BIGINT NULL;
