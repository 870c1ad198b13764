//! The services a daemon knows, kept on disk (`registry`, by default
//! /var/lib/dataplane/services.json) so that a restarted daemon still
//! knows them. Each is recorded with its processes' identities (pid and
//! start time): at start, a service whose instance is gone is dropped with
//! a warning, and one whose instance runs is adopted.
use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

use crate::{host::tasks::Identity, service::Service};

/// The registered services, by name; every change is on disk before it
/// is answered.
pub struct Registry {
    path: PathBuf,
    services: Mutex<BTreeMap<String, Service>>,
}

impl Registry {
    /// The services recorded at `path` whose instances still run (none if
    /// there is no file yet). A file that is not a registry is kept aside
    /// as `PATH.damaged` and the daemon starts with none. What was dropped
    /// or set aside, one line each, comes with it.
    pub fn open(path: &Path) -> Result<(Self, Vec<String>), RegistryError> {
        let read = |source| RegistryError::Read {
            path: path.to_owned(),
            source,
        };
        let mut notes = Vec::new();
        let stored: Vec<Stored> = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice::<File>(&bytes) {
                Ok(file) => file.services,
                Err(e) => {
                    let aside = path.with_extension("json.damaged");
                    std::fs::rename(path, &aside).map_err(read)?;
                    notes.push(format!(
                        "{} is not a registry ({e}): kept as {}; no service is known",
                        path.display(),
                        aside.display()
                    ));
                    Vec::new()
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(read(e)),
        };
        let count = stored.len();
        let mut services = BTreeMap::new();
        for Stored {
            mut service,
            registered,
        } in stored
        {
            let runs = |pid| {
                registered
                    .iter()
                    .any(|i: &Identity| i.pid == pid && i.runs())
            };
            if !runs(service.pid) {
                notes.push(format!(
                    "service {}: its instance {} is gone: forgotten",
                    service.name, service.pid
                ));
                continue;
            }
            if let Some(standby) = service.standby_pid.filter(|&pid| !runs(pid)) {
                notes.push(format!(
                    "service {}: its standby {standby} is gone: kept without it",
                    service.name
                ));
                service.standby_pid = None;
            }
            service.registered = registered.into_iter().filter(|i| i.runs()).collect();
            services.insert(service.name.clone(), service);
        }
        let registry = Self {
            path: path.to_owned(),
            services: Mutex::new(services),
        };
        if registry.len() != count {
            let services = registry.services.lock().unwrap();
            registry.save(&services)?;
        }
        Ok((registry, notes))
    }

    /// Records `service` (its `registered` identities set by the caller);
    /// an error if one of that name is registered already.
    pub fn insert(&self, service: Service) -> Result<(), RegistryError> {
        let mut services = self.services.lock().unwrap();
        if services.contains_key(&service.name) {
            return Err(RegistryError::Exists(service.name));
        }
        let name = service.name.clone();
        services.insert(name.clone(), service);
        if let Err(e) = self.save(&services) {
            services.remove(&name);
            return Err(e);
        }
        Ok(())
    }

    /// Records `service` in place of the one of its name (its `registered`
    /// identities set by the caller); an error if there is none.
    pub fn replace(&self, service: Service) -> Result<(), RegistryError> {
        let mut services = self.services.lock().unwrap();
        let Some(old) = services.insert(service.name.clone(), service.clone()) else {
            services.remove(&service.name);
            return Err(RegistryError::Unknown(service.name));
        };
        if let Err(e) = self.save(&services) {
            services.insert(old.name.clone(), old);
            return Err(e);
        }
        Ok(())
    }

    /// Forgets service `name`: what it was, if it was known.
    pub fn remove(&self, name: &str) -> Result<Option<Service>, RegistryError> {
        let mut services = self.services.lock().unwrap();
        let Some(service) = services.remove(name) else {
            return Ok(None);
        };
        if let Err(e) = self.save(&services) {
            services.insert(name.to_string(), service);
            return Err(e);
        }
        Ok(Some(service))
    }

    pub fn get(&self, name: &str) -> Option<Service> {
        self.services.lock().unwrap().get(name).cloned()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.services.lock().unwrap().contains_key(name)
    }

    /// Every service, by name.
    pub fn list(&self) -> Vec<Service> {
        self.services.lock().unwrap().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.services.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn save(&self, services: &BTreeMap<String, Service>) -> Result<(), RegistryError> {
        let file = File {
            services: services
                .values()
                .map(|s| Stored {
                    service: s.clone(),
                    registered: s.registered.clone(),
                })
                .collect(),
        };
        let text = serde_json::to_vec_pretty(&file).expect("a registry serializes");
        crate::host::replace_file(&self.path, &text).map_err(|source| RegistryError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

/// The registry as it is on disk.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    services: Vec<Stored>,
}

/// One service on disk, with the identities of its processes (which a
/// caller never sets, and so [`Service`] does not carry on the wire).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    service: Service,
    registered: Vec<Identity>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("service {0} is registered already")]
    Exists(String),
    #[error("no service {0} is registered")]
    Unknown(String),
    #[error("reading the registry {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("writing the registry {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, pid: u32, standby_pid: Option<u32>) -> Service {
        Service {
            name: name.into(),
            pid,
            netns: None,
            flows: vec![crate::service::FlowSpec {
                cps: "192.0.2.1:4000".parse().unwrap(),
                service: "192.0.2.10:5000".parse().unwrap(),
            }],
            standby_pid,
            command: None,
            container: None,
            standby_container: None,
            runtime: Default::default(),
            registered: std::iter::once(pid)
                .chain(standby_pid)
                .filter_map(Identity::of)
                .collect(),
        }
    }

    #[test]
    fn services_outlive_the_registry_and_dead_ones_are_dropped_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/services.json");
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let mut standby = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let (registry, notes) = Registry::open(&path).unwrap();
        assert!(notes.is_empty() && registry.is_empty());
        registry
            .insert(service("live", sleeper.id(), Some(standby.id())))
            .unwrap();
        // A pid that ran once and ran something else since is not adopted.
        let mut reused = service("reused", std::process::id(), None);
        reused.registered[0].start_time += 1;
        registry.insert(reused).unwrap();
        assert!(matches!(
            registry.insert(service("live", sleeper.id(), None)),
            Err(RegistryError::Exists(_))
        ));
        drop(registry);

        standby.kill().unwrap();
        standby.wait().unwrap();
        let (registry, notes) = Registry::open(&path).unwrap();
        assert_eq!(
            notes,
            [
                format!(
                    "service live: its standby {} is gone: kept without it",
                    standby.id()
                ),
                format!(
                    "service reused: its instance {} is gone: forgotten",
                    std::process::id()
                ),
            ]
        );
        let live = registry.get("live").unwrap();
        assert_eq!((live.pid, live.standby_pid), (sleeper.id(), None));
        assert_eq!(registry.list().len(), 1);
        assert_eq!(registry.remove("live").unwrap().unwrap().pid, sleeper.id());
        drop(registry);
        let (registry, _) = Registry::open(&path).unwrap();
        assert!(registry.is_empty(), "the removal was on disk");
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
    }

    #[test]
    fn a_damaged_registry_is_kept_aside_and_the_daemon_starts_with_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("services.json");
        std::fs::write(&path, "{\"services\": [").unwrap();
        let (registry, notes) = Registry::open(&path).unwrap();
        assert!(registry.is_empty());
        assert!(notes[0].contains("is not a registry"), "{notes:?}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("services.json.damaged")).unwrap(),
            "{\"services\": ["
        );
        assert!(!path.exists());
    }
}
