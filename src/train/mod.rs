pub mod optim;
