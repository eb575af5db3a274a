import sys

from lookahead_dist.elastic.supervisor import main

sys.exit(main())
