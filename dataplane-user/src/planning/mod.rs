//! Planning a migration: the cost model fitted to calibration runs and to
//! reports, calibration itself, the pre-copy stop policy, and the plan
//! that predicts every method for one service.
pub mod calibrate;
pub mod model;
pub mod plan;
pub mod policy;
