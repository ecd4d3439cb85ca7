//! Min / median / max of a handful of samples.

use std::time::Duration;

#[derive(Default)]
pub struct Samples {
    values: Vec<f64>,
    unit_ms: bool,
}

impl Samples {
    pub fn push(&mut self, d: Duration) {
        self.unit_ms = true;
        self.values.push(d.as_secs_f64() * 1000.0);
    }

    pub fn push_value(&mut self, v: f64) {
        self.values.push(v);
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.values.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    pub fn median(&self) -> f64 {
        let v = self.sorted();
        if v.is_empty() {
            f64::NAN
        } else {
            v[v.len() / 2]
        }
    }

    fn fmt(&self, x: f64) -> String {
        if self.unit_ms {
            format!("{x:.0} ms")
        } else {
            format!("{x:.0}")
        }
    }

    pub fn row(&self, name: &str) {
        let v = self.sorted();
        if v.is_empty() {
            println!("| {name} | - | - | - |");
            return;
        }
        println!(
            "| {name} | {} | {} | {} |",
            self.fmt(v[0]),
            self.fmt(self.median()),
            self.fmt(v[v.len() - 1])
        );
    }

    pub fn row_value(&self, name: &str) {
        self.row(name)
    }
}
