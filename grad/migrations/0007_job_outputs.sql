-- Output sets of jobs beside those of runners: a job's set has the job's id
-- and holds what its last attempt collected.
ALTER TABLE output_sets ADD COLUMN source TEXT NOT NULL DEFAULT 'runner';
