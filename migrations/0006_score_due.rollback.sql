DROP INDEX predictions_score_due_idx;
ALTER TABLE predictions DROP COLUMN score_next_at;
