//! Writes inputs in the layout `arbitrary`'s derived implementations read, so that a seed is
//! written as the operations it stands for. Integers are little endian, a bool is a byte, an
//! `Option` a bool then its value, an enum the `u32` that selects its variant, then its fields.
//! `seeds` tests check every seed decodes back to the values it was written from.

#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    /// Selects variant `index` of an enum of `count` variants: `arbitrary` maps a `u32` `v`
    /// to `(v * count) >> 32`, so the smallest `v` that maps to `index` is its ceiling.
    pub fn variant(&mut self, index: u32, count: u32) -> &mut Self {
        let v = (u64::from(index) << 32).div_ceil(u64::from(count));
        self.u32(v as u32)
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }

    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(v as u8)
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend(v.to_le_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend(v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend(v.to_le_bytes());
        self
    }

    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
}

/// An input value that can be written back in `arbitrary`'s layout.
pub trait Seed {
    fn write(&self, w: &mut Writer);
}

/// The bytes of a sequence of operations, as [`crate::ops`] reads them.
pub fn encode<T: Seed>(ops: &[T]) -> Vec<u8> {
    let mut w = Writer::default();
    for op in ops {
        op.write(&mut w);
    }
    w.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbitrary::{Arbitrary, Unstructured};

    #[derive(Debug, PartialEq, Arbitrary)]
    enum Three {
        A,
        B(u16),
        C { x: bool, y: Option<u64> },
    }

    impl Seed for Three {
        fn write(&self, w: &mut Writer) {
            match self {
                Three::A => w.variant(0, 3),
                Three::B(v) => w.variant(1, 3).u16(*v),
                Three::C { x, y } => {
                    w.variant(2, 3).bool(*x).bool(y.is_some());
                    y.map(|y| w.u64(y));
                    w
                }
            };
        }
    }

    #[test]
    fn written_values_decode_back() {
        let values = vec![Three::C { x: true, y: Some(7) }, Three::A, Three::B(513), Three::C { x: false, y: None }];
        assert_eq!(crate::ops::<Three>(&encode(&values)), values);
        // Every variant index of every enum size selects itself.
        for count in [1u32, 2, 3, 7, 12, 255] {
            for index in 0..count {
                let mut w = Writer::default();
                w.variant(index, count);
                let v = u32::arbitrary(&mut Unstructured::new(&w.0)).unwrap();
                assert_eq!((u64::from(v) * u64::from(count)) >> 32, u64::from(index), "{index} of {count}");
            }
        }
    }
}
