int imgfs_placeholder;
