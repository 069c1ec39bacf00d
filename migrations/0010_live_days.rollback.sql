DROP TABLE model_live_days;
