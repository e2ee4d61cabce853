//! The in-memory view of who is online where, in this DC and, when replicating, in others.

use std::collections::{BTreeMap, HashMap};

use chinwag_core::{Coordinate, DcName, UserId};

/// The in-memory view of who is online where.
#[derive(Default)]
pub struct CoordinateMap {
    by_user: HashMap<UserId, Vec<Coordinate>>,
    count: usize,
    /// Users with at least one coordinate in each DC.
    users_by_dc: HashMap<DcName, u64>,
}

impl CoordinateMap {
    pub fn apply(&mut self, user: UserId, at: Coordinate, added: bool) {
        if added {
            let entry = self.by_user.entry(user).or_default();
            if !entry.contains(&at) {
                if !entry.iter().any(|c| c.dc == at.dc) {
                    *self.users_by_dc.entry(at.dc.clone()).or_default() += 1;
                }
                entry.push(at);
                self.count += 1;
            }
            return;
        }
        let Some(entry) = self.by_user.get_mut(&user) else {
            return;
        };
        if let Some(i) = entry.iter().position(|c| *c == at) {
            entry.swap_remove(i);
            self.count -= 1;
            if !entry.iter().any(|c| c.dc == at.dc)
                && let Some(n) = self.users_by_dc.get_mut(&at.dc)
            {
                *n -= 1;
                if *n == 0 {
                    self.users_by_dc.remove(&at.dc);
                }
            }
        }
        if entry.is_empty() {
            // Keep the map the size of the online population, not of everyone ever seen.
            self.by_user.remove(&user);
        }
    }

    pub fn of(&self, user: &UserId) -> &[Coordinate] {
        self.by_user.get(user).map_or(&[], Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.count
    }

    /// Online users per DC (a user online in two DCs counts in both).
    pub fn users_by_dc(&self) -> BTreeMap<DcName, u64> {
        self.users_by_dc.iter().map(|(dc, n)| (dc.clone(), *n)).collect()
    }
}

#[cfg(test)]
mod tests {
    use chinwag_core::NodeName;

    use super::*;

    fn at(dc: &str, conn: u64) -> Coordinate {
        Coordinate {
            dc: DcName::parse(dc).unwrap(),
            node: NodeName::parse("n1").unwrap(),
            incarnation: 1,
            conn,
        }
    }

    #[test]
    fn users_are_counted_once_per_dc_however_many_devices() {
        let mut map = CoordinateMap::default();
        let (bob, al) = (UserId::parse("bob").unwrap(), UserId::parse("al").unwrap());
        map.apply(bob.clone(), at("east", 1), true);
        map.apply(bob.clone(), at("east", 2), true);
        map.apply(bob.clone(), at("west", 3), true);
        map.apply(al.clone(), at("east", 4), true);
        let count = |map: &CoordinateMap, dc: &str| map.users_by_dc().get(&DcName::parse(dc).unwrap()).copied();
        assert_eq!((count(&map, "east"), count(&map, "west")), (Some(2), Some(1)));
        map.apply(bob.clone(), at("east", 1), false);
        assert_eq!(count(&map, "east"), Some(2), "bob still has a device in east");
        map.apply(bob.clone(), at("east", 2), false);
        map.apply(bob.clone(), at("east", 2), false);
        assert_eq!(count(&map, "east"), Some(1));
        map.apply(bob, at("west", 3), false);
        assert_eq!(count(&map, "west"), None);
        assert_eq!(map.len(), 1);
    }
}
