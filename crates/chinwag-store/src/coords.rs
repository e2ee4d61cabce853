//! The in-memory view of who is online where, in this DC and, when replicating, in others.

use std::collections::HashMap;

use chinwag_core::{Coordinate, UserId};

/// The in-memory view of who is online where.
#[derive(Default)]
pub struct CoordinateMap {
    by_user: HashMap<UserId, Vec<Coordinate>>,
    count: usize,
}

impl CoordinateMap {
    pub fn apply(&mut self, user: UserId, at: Coordinate, added: bool) {
        if added {
            let entry = self.by_user.entry(user).or_default();
            if !entry.contains(&at) {
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
}
