-- Datasets of each runner: their descriptions and mount status (JSON, no
-- secrets), and their credentials sealed with grad's secrets key.
ALTER TABLE runners ADD COLUMN datasets TEXT NOT NULL DEFAULT '[]';
ALTER TABLE runners ADD COLUMN dataset_credentials TEXT NOT NULL DEFAULT '';
