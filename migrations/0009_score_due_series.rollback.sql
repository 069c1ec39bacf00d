DROP STATISTICS IF EXISTS predictions_score_due_stats;
DROP INDEX IF EXISTS predictions_score_series_idx;
