-- transactional: false
DROP STATISTICS IF EXISTS predictions_score_due_stats;
DROP INDEX CONCURRENTLY IF EXISTS predictions_score_series_idx;
