DROP TABLE live_outcomes;
