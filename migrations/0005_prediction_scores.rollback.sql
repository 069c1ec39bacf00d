DROP TABLE model_live_stats;
DROP TABLE prediction_scores;
