"""Sources turn a collection (folder, file list, loc.gov search, beto.pt) into MapRecords."""
