DROP TABLE prediction_steps;
DROP TABLE predictions;
