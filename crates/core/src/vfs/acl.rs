//! POSIX access ACLs as tools write them (`system.posix_acl_access`).
//!
//! artifactfs stores no ACLs: a run records mode bits, and the manifest has no place for more.
//! But `cp -a`, `rsync -A` and `tar --acls` copy a file's access ACL even when it only restates
//! the mode (a *minimal* ACL: owner, owning group and others, nothing else), and treat a refusal
//! as a failure to preserve permissions. A local file system such as ext4 keeps no ACL in that
//! case either: it sets the mode bits the ACL states. The mount does the same, and refuses only
//! ACLs that carry more than the mode can (named users or groups, a mask).

use crate::error::{Error, Result};

/// The xattr name of a file's access ACL.
pub const ACCESS: &str = "system.posix_acl_access";
/// The xattr name of a directory's default ACL.
pub const DEFAULT: &str = "system.posix_acl_default";

/// The version of the xattr encoding (`POSIX_ACL_XATTR_VERSION`).
const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

/// Whether `name` is one of the POSIX ACL xattrs.
pub fn is_acl(name: &str) -> bool {
    name == ACCESS || name == DEFAULT
}

/// The permission bits (`0o777`) a minimal access ACL states, or why it is refused:
/// `Error::Invalid` for bytes that are no ACL, `Error::Unsupported` for an ACL with more
/// entries than the mode bits can hold.
pub fn minimal_acl_mode(value: &[u8]) -> Result<u32> {
    let bad = |why: &str| Error::invalid(format!("xattr {ACCESS}"), why.to_owned());
    if value.len() < 4 || !(value.len() - 4).is_multiple_of(8) {
        return Err(bad("not a POSIX ACL: its length is not 4 + 8 × entries"));
    }
    let version = u32::from_le_bytes(value[..4].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(bad(&format!(
            "not a POSIX ACL: version {version}, not {VERSION}"
        )));
    }
    let (mut user, mut group, mut other) = (None, None, None);
    let mut extended = false;
    for e in value[4..].chunks_exact(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u16::from_le_bytes([e[2], e[3]]);
        if perm > 7 {
            return Err(bad(&format!("permission {perm:#o} of an entry is not rwx")));
        }
        let slot = match tag {
            USER_OBJ => &mut user,
            GROUP_OBJ => &mut group,
            OTHER => &mut other,
            USER | GROUP | MASK => {
                extended = true;
                continue;
            }
            t => return Err(bad(&format!("unknown entry tag {t:#x}"))),
        };
        if slot.replace(u32::from(perm)).is_some() {
            return Err(bad(&format!("entry tag {tag:#x} twice")));
        }
    }
    let (Some(u), Some(g), Some(o)) = (user, group, other) else {
        return Err(bad("an ACL needs owner, group and other entries"));
    };
    if extended {
        return Err(Error::Unsupported(format!(
            "xattr {ACCESS}: ACLs with named users or groups are not stored (only the mode bits a minimal ACL states)"
        )));
    }
    Ok((u << 6) | (g << 3) | o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = VERSION.to_le_bytes().to_vec();
        for (tag, perm, id) in entries {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        v
    }

    const ANY: u32 = u32::MAX;

    #[test]
    fn a_minimal_acl_is_its_mode() {
        let v = acl(&[(USER_OBJ, 6, ANY), (GROUP_OBJ, 4, ANY), (OTHER, 0, ANY)]);
        assert_eq!(minimal_acl_mode(&v).unwrap(), 0o640);
        let v = acl(&[(USER_OBJ, 7, ANY), (GROUP_OBJ, 5, ANY), (OTHER, 5, ANY)]);
        assert_eq!(minimal_acl_mode(&v).unwrap(), 0o755);
    }

    #[test]
    fn extended_acls_are_unsupported_and_garbage_is_invalid() {
        let named = acl(&[
            (USER_OBJ, 6, ANY),
            (USER, 6, 1000),
            (GROUP_OBJ, 4, ANY),
            (MASK, 6, ANY),
            (OTHER, 0, ANY),
        ]);
        assert!(matches!(
            minimal_acl_mode(&named),
            Err(Error::Unsupported(_))
        ));
        for bad in [
            vec![],
            vec![2, 0, 0],
            acl(&[(USER_OBJ, 6, ANY), (GROUP_OBJ, 4, ANY)]),
            acl(&[(USER_OBJ, 6, ANY), (USER_OBJ, 6, ANY), (OTHER, 0, ANY)]),
            acl(&[(USER_OBJ, 9, ANY), (GROUP_OBJ, 4, ANY), (OTHER, 0, ANY)]),
            acl(&[(USER_OBJ, 6, ANY), (GROUP_OBJ, 4, ANY), (0x40, 0, ANY)]),
            {
                let mut v = acl(&[(USER_OBJ, 6, ANY), (GROUP_OBJ, 4, ANY), (OTHER, 0, ANY)]);
                v[0] = 1;
                v
            },
            {
                let mut v = acl(&[(USER_OBJ, 6, ANY), (GROUP_OBJ, 4, ANY), (OTHER, 0, ANY)]);
                v.push(0);
                v
            },
        ] {
            assert!(
                matches!(minimal_acl_mode(&bad), Err(Error::Invalid { .. })),
                "{bad:?}"
            );
        }
    }
}
